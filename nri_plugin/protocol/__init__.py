"""NRI wire protocol: ttrpc frames, the NRI connection multiplexer, protobuf messages.

Sans-IO: nothing in this package opens a socket or reads a clock. Bytes go in, typed
events come out, and outgoing messages become bytes for the caller to write.
"""
