"""The DeepSeek-V2 network: MLA attention, MoE feed-forward, YaRN rotary embeddings."""
