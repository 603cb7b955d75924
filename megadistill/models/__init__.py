"""Model families. Each family is a subpackage; methods reach models only through an adapter."""
