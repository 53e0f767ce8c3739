"""The one place programs are started and sensitive files are written."""
