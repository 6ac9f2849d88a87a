"""A torchtune recipe's model as its builder makes it, on the meta device (:func:`builder_model`).

Apart from :mod:`.meta` because it needs torch at import, and :mod:`plop.audit.check` imports torch only
once the input is known to be buildable."""

from __future__ import annotations

from torch import nn

from ..stacks.reading import StackConfig


class _Builder(nn.Module):
    """The root of a builder's module tree; its output projection is the head, as
    ``get_output_embeddings`` names it on a transformers model (None when tied to the embeddings)."""

    head: str | None = None

    def get_output_embeddings(self) -> nn.Module | None:
        return self.get_submodule(self.head) if self.head else None


def builder_model(spec: StackConfig) -> tuple[nn.Module, dict]:
    """A torchtune recipe's model as its builder (``model._component_``) makes it, on the meta
    device: every linear layer under torchtune's own names, from plop's table of torchtune's
    builders (:mod:`plop.stacks.torchtune`), and the builder's facts for the report. Only the
    linear layers are built: the parameters LoRA adds and PEFT counts depend on nothing else."""
    import torch

    from ..stacks import torchtune

    component, entry = torchtune.builder(spec)
    linears = torchtune.modules(entry)
    root = _Builder()
    with torch.device("meta"):
        for name, row in linears.items():
            parent = root
            for part in name.split(".")[:-1]:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(name.rsplit(".", 1)[-1], nn.Linear(*row["shape"], bias=row["bias"]))
    root.head = next((n for n, row in linears.items() if row.get("switch") == "output"), None)
    info = {"id": component, "architecture": torchtune.builder_name(component),
            "model_type": f"torchtune {torchtune.table()['torchtune']}", "parameters": entry["parameters"]}
    return root, info
