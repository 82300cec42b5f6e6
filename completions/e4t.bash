_e4t_completion() {
    local IFS=$'
'
    COMPREPLY=( $( env COMP_WORDS="${COMP_WORDS[*]}" \
                   COMP_CWORD=$COMP_CWORD \
                   _E4T_COMPLETE=complete_bash $1 ) )
    return 0
}

complete -o default -F _e4t_completion e4t
