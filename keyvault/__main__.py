from keyvault.cli import run

run()
