"""The `npu-dit` command-line tool and its helpers."""
