import click


@click.command("merge")
def main() -> None:
    """placeholder"""
