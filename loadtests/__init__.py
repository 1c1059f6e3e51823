"""Locust harness: sessions through NTMobile tunnels to the balanced service, verdicts, plots."""
