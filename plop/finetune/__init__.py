"""Fine-tuning where the diagnosis says: PEFT LoRA / LoRA+ / DoRA on the transformers Trainer, placement
comparisons at a matched budget, and task adapters. The diagnosis never imports this package.

:mod:`.config` (TrainConfig), :mod:`.method` (what a method gives a run), :mod:`.sft` (response-only
labels, the SFT method), :mod:`.grpo`, :mod:`.lora` (the PEFT wrap),
:mod:`.hf_trainer` (LoRA+ on the Trainer), :mod:`.run_report` (a run placed by its own diagnosis),
:mod:`.trainer` (``plop.train``), :mod:`.compare`, :mod:`.adapters`,
:mod:`.evidence` (paired statistics and the decision rule for comparisons; numpy only).
"""
