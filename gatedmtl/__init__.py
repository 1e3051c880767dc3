"""gatedmtl."""
