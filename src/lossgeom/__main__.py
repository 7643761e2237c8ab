from lossgeom.cli import main

main()
