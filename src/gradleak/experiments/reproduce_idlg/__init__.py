"""`gradleak reproduce idlg`: iDLG's Table 1 and Figure 1 (run, protocol, report, paper)."""
