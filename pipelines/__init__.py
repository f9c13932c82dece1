"""End-to-end jobs: the one layer that runs the library, export and the runtime together."""
