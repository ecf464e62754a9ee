"""Stage 1: mining hard samples."""
