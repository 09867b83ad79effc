"""SEAL's knowledge-incorporation test-time-training server, rebuilt as one JAX process.

protocol   the JSON wire format of SEAL's TTT_server.py: request validation, replies, limits
prompts    answer prompts (SEAL's template or the tokenizer's chat template), training rows
grading    pluggable graders; the default is normalised exact/substring match
engine     one request: baseline eval -> LoRA fine-tune (trainer core) -> adapted eval
server     the ZMQ REP loop (one reply per request, always) and its JSONL log
client     `query(...)` with SEAL's retry behaviour, `shutdown(...)`
knowledge  a synthetic knowledge set (invented entities) for the demo and the evidence run
"""
