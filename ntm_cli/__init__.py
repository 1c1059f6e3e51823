"""ntm_cli."""
