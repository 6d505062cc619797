"""Calibration samples: token id lists from a JSONL file of {"text": ...} or {"messages": [...]}
records (the model's chat template applied to messages), or from the bundled texts below. Offline:
nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

from fp4serve.errors import ConfigError

# Our own short texts of different kinds (prose, dialogue, code, arithmetic, lists), so the
# activation ranges cover more than one register. Messages go through the chat template.
BUNDLED = [
    {"text": "The river rose for three days after the storm. On the fourth morning the ferryman tied his "
             "boat to the old oak, walked up the hill to the school and offered to carry the children across "
             "one at a time, since the bridge had been closed and the bus could not reach the far bank."},
    {"messages": [{"role": "user", "content": "How do I keep basil alive on a windowsill?"},
                  {"role": "assistant", "content": "Give it at least six hours of light, water when the top "
                   "centimetre of soil is dry, and pinch off flower buds so the plant keeps making leaves."}]},
    {"text": "def merge_sorted(a, b):\n    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n"
             "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n"
             "            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n"},
    {"text": "A train leaves at 14:05 and arrives at 17:50, so the journey takes 3 hours and 45 minutes. "
             "At an average of 88 km/h that is 330 km. If the return train is 10% faster, it needs about "
             "3 hours and 25 minutes, arriving at 21:15 when it departs at 17:50."},
    {"messages": [{"role": "system", "content": "You are a concise assistant."},
                  {"role": "user", "content": "Summarise why the sky is blue in two sentences."},
                  {"role": "assistant", "content": "Air molecules scatter short blue wavelengths of sunlight "
                   "much more than red ones. That scattered blue light reaches our eyes from every direction."}]},
    {"text": "Checklist for the field trip: 1. signed permission forms; 2. packed lunches and water; "
             "3. a first-aid kit; 4. the list of emergency phone numbers; 5. spare jumpers in case it rains; "
             "6. a camera for the report on the wetland birds."},
    {"text": "SELECT customer_id, COUNT(*) AS orders, SUM(total) AS spent FROM orders WHERE placed_at >= "
             "'2024-01-01' GROUP BY customer_id HAVING COUNT(*) > 3 ORDER BY spent DESC LIMIT 20;"},
    {"text": "Die Bibliothek öffnet um neun Uhr. Le musée ferme à dix-huit heures. El mercado está abierto "
             "los sábados. 図書館は九時に開きます。 The library opens at nine, the museum closes at six."},
]  # fmt: skip


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--calib-data {path}: no such file")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{number}: not JSON ({e})") from e
        if not isinstance(record, dict) or not ("text" in record or "messages" in record):
            raise ConfigError(f'{path}:{number}: expected {{"text": ...}} or {{"messages": [...]}}')
        records.append(record)
    if not records:
        raise ConfigError(f"--calib-data {path}: no records")
    return records


def calibration_samples(tokenizer, records: list[dict], num_samples: int, seq_len: int) -> list[list[int]]:
    """Up to num_samples token id lists of at most seq_len tokens each."""
    if num_samples < 1 or seq_len < 2:
        raise ConfigError(f"--num-samples must be >= 1 and --seq-len >= 2 (got {num_samples}, {seq_len})")
    samples = []
    for record in records[:num_samples]:
        if "messages" in record:
            if not getattr(tokenizer, "chat_template", None):
                raise ConfigError("a calibration record has messages, but the tokenizer has no chat template")
            text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(str(record["text"]))["input_ids"]
        if len(ids) >= 2:
            samples.append(list(ids[:seq_len]))
    if not samples:
        raise ConfigError("no calibration sample has two or more tokens")
    return samples
