"""A tiny instruct checkpoint in the Hugging Face layout, written by the tests (no download).

Llama architecture (2 layers, d 64, GQA) with random weights from test_convert's writers and a
byte-level BPE tokenizer with SmolLM2's conventions: ChatML template, `<|im_start|>` BOS,
`<|im_end|>` EOS and pad, no BOS added. Any text encodes, so every stage of the demo's second
part (code prompts, SEAL passages, the default corpus) runs on it as on the real model.
"""
from __future__ import annotations

import json
from pathlib import Path

from test_convert import hf_config, hf_weights, write_safetensors

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TEXT = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
         "Who founded the library? In what year was it founded? The town of 1750.\n",
         "import os\nclass Foo:\n    def __init__(self, x):\n        self.x = x\n",
         "```python\nreturn [x for x in numbers if x > 0]\n```\n"]


def write_tokenizer(d: Path, vocab_size: int = 384) -> int:
    """tokenizer.json + tokenizer_config.json in `d`; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TEXT * 10, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "chat_template": CHATML, "add_bos_token": False}))
    return tok.get_vocab_size()


def write_tiny_instruct(d: str | Path, *, seed: int = 0) -> Path:
    """A loadable `hf:DIR` checkpoint (config.json, model.safetensors, tokenizer) in `d`."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(d)
    c = hf_config(vocab_size=vocab, intermediate_size=128, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2)
    (d / "config.json").write_text(json.dumps(c))
    W = hf_weights(c, seed=seed)
    W["model.embed_tokens.weight"] *= 0.05  # tied unembedding: logits of a sane scale
    write_safetensors(d / "model.safetensors", W)
    return d
