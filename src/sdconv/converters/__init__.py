"""The engine: registry, schema, transforms, detection, planning, execution and I/O."""
