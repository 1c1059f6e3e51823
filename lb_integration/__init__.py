"""lb_integration: the LB host agent (`ntm lb`): IPVS or nftables, health checks, return routes."""
