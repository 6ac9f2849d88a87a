"""Reading the model: loading it, naming its layers and role-true module types, which modules PEFT
can adapt, the named placements, and what share of the weights the diagnosis covers."""
