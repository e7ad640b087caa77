"""Recipe + base model -> plan: base-model facts, layout expansion, planners (full and from headers)."""
