"""The recipe language: schema, YAML source with positions, generated reference, anatomy override spec."""
