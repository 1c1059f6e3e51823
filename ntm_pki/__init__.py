"""ntm_pki: the lab CA and certificates (`ntm pki`). See ntm_pki.ca for the encoding."""
