"""Mutation fuzzing of the NRI decoders and the dispatch path from the recorded captures.

`mutate` derives inputs from the captured runtime -> plugin traffic, `oracle` feeds them to
the protocol core and the policy and says what went wrong; `test_fuzz_captures.py` is the
short CI run and `bench/fuzz_wire.py` the long one (docs/fuzzing.md).
"""
