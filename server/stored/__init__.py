"""Stored chat completions (`store: true`): kept in the database with what training needs, and
served back as OpenAI's `/v1/chat/completions` list / retrieve / update / delete / messages."""
