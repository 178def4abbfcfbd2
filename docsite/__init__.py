"""The documentation as a build product: sections generated from committed journals and the OpenAPI document
(`generated.py`), the check that every link and every quoted `udg` command resolves (`check.py`), and the
`udg docs` commands. The site itself is built by mkdocs from `mkdocs.yml` (`make docs`)."""
