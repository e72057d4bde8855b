"""OpenAI-compatible endpoints: protocol (wire schemas), serving (logic), router (thin routes)."""
