"""Transport security for split learning: mutual TLS (`tls`) and per-frame AEAD (`cipher`)."""
