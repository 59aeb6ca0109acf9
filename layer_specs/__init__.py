"""ModuleSpecs for hybrid stacks with Mamba-3 layers; installed as `megatron_mamba3.layer_specs`.

Empty until the Megatron mixer lands: the specs need `Mamba3Mixer`.
"""
