"""What trains and how: filter rules and specs, optimizer groups and layer-wise decay, LoRA/DoRA
adapters with PEFT files, zero-shot heads."""
