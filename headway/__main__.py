from headway.cli.main import app

app(prog_name="headway")
