import click


@click.command("compact")
def main() -> None:
    """placeholder"""
