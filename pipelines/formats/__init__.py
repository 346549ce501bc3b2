"""Every file and column name that stages write and read, owned in one place (docs/architecture.md, "Formats")."""
