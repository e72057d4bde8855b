"""The admin wire schemas live in the bottom layer (`common.admin_protocol`), where clients import them too."""

from common.admin_protocol import *  # noqa: F401,F403
