"""xdl's built-in analyzers, registered through entry points exactly as a third-party
package registers its own (see pyproject.toml). ``xdl`` itself never imports this package."""
