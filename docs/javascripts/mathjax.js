// MathJax configuration for pymdownx.arithmatex (generic mode): \( \) inline, \[ \] display,
// inside elements of class "arithmatex" only. docs/hooks.py puts the notebooks' $...$ into
// the same form and serves MathJax itself with the site (javascripts/mathjax/).
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  }
};

document$.subscribe(() => {
  if (window.MathJax && MathJax.startupPromise) {
    MathJax.startupPromise.then(() => {
      MathJax.typesetClear();
      MathJax.texReset();
      MathJax.typesetPromise();
    });
  }
});
