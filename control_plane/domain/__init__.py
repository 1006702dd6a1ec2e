"""Pure domain logic: no I/O, no clocks of its own. Servicers call in; nothing here calls out."""
