"""`ntm adaptor`: the NTMobile Adaptor (NTMA), an NTM endpoint acting for a service."""
