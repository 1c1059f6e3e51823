"""ntm_proto."""
