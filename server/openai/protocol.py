"""The OpenAI wire schemas live in the bottom layer (`common.protocol`), where clients import them too."""

from common.protocol import *  # noqa: F401,F403
