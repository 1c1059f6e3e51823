"""ntm_io."""
