"""The language-model stage: chunked prefill with attention sinks and a sliding window, KV blocks
spilled to the tiered store, query-time retrieval (ReKV). See docs/kv-memory.md."""
