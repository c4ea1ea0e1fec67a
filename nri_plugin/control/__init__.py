"""Controllers: one per host domain, applying the engine's host intents after the reply.

The containers/nri-plugins control model: each controller owns one domain ("oom" today;
"rdt", "io", "net", mitigation and eviction as they land), has the lifecycle hooks
PreCreate, PostStart, PostUpdate and PostStop, and runs in a mode — Required (it must
start, or nri-qos does not) or Optional (if it cannot start it is disabled with the
reason, and everything else runs). Whatever a hook raises is caught per intent, so one
failing backend never stops another domain, nor the CPU path, which the runtime applies.

`base` holds the contract and the registry (`Controllers`), `oom` the first controller,
`executor` the thread that runs them off the request path.
"""
