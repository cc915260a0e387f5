"""The online half: the answering pipeline, the workspace query engine and the HTTP server."""
