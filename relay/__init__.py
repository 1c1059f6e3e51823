"""`ntm relay`: the Relay Server.

Forwards tunnel packets by path id between the two ends a DC named, across address
families, without decrypting; not an open relay. `relay.core` is the sans-IO core,
`relay.server` the asyncio glue, `relay.config` the TOML file, `relay.cli` the subcommand.
The binding packets the ends send live in `ntm_proto.relay_binding` (nodes use them too).
"""
