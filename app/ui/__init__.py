"""The web dashboard at /ui: server-rendered pages whose scripts call the public /v1 API."""
