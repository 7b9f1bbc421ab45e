from pgotel_proxy.cli import main

main()
