"""What a model is: where it comes from (:mod:`.source`), its decoder blocks and Linears
(:mod:`.structure`), GPT-2 Conv1D and MoE experts as Linears. No loading, no I/O."""
