"""The one error bad data raises: it names the file, the column and the first bad row."""

from __future__ import annotations


class DataError(ValueError):
    """A data source is missing, corrupt or malformed; the message says which file, column and row, and why."""

    def __init__(self, message: str, file: str | None = None, column: str | None = None, row: int | None = None):
        super().__init__(message)
        self.file, self.column, self.row = file, column, row


def bad_data(file, column: str | None, row: int | None, problem: str) -> DataError:
    """`file: column 'c', row r: problem` (rows count from 1, the header not included)."""
    where = [str(file)]
    if column is not None:
        where.append(f"column {column!r}")
    if row is not None:
        where.append(f"row {row}")
    return DataError(f"{': '.join(where[:1])}: {', '.join(where[1:])}{': ' if len(where) > 1 else ''}{problem}",
                     file=str(file), column=column, row=row)
