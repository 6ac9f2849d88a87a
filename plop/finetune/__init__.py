"""Fine-tuning where the diagnosis says: the configuration (:mod:`.config`), SFT data (:mod:`.sft`),
the PEFT wrap (:mod:`.lora`), the ``transformers.Trainer`` subclass (:mod:`.hf_trainer`), training
(:mod:`.trainer`), placement comparisons (:mod:`.compare`) and task adapters (:mod:`.adapters`).

The diagnosis never imports this package; it imports the diagnosis.
"""
