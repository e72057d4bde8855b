"""The OpenAI Files and Batch APIs: `/v1/files`, `/v1/batches`, and the runner that answers a
batch's lines in-process through the same serving path as the HTTP endpoints."""
