"""ntm_node."""
