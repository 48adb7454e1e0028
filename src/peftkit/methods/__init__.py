"""One file per PEFT method: its config dataclass, its layers, its merge rule, its state-dict rule."""
